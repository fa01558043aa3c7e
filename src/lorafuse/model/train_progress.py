"""What a person running `lorafuse train` sees while it runs.

- One plain line per stage on stderr (loading the model, training N steps, each validation, writing), kept by
  `--quiet`: a run on real data takes many minutes, and a command silent that long looks hung.
- Unless quiet, one progress bar with the latest loss in its postfix. It replaces the Trainer's own
  ProgressCallback, which writes every log dict (`{'loss': ..., 'grad_norm': ...}`) as a line under the bar,
  and it says `validating…` while a validation pass runs (the bar would otherwise stand still, unexplained).
"""

from __future__ import annotations

import os
import sys
from typing import Any

PREFIX = "lorafuse train: "


def first_process() -> bool:
    """Under `accelerate launch` only the first process speaks."""
    return os.environ.get("RANK", "0") == "0"


class TrainProgress:
    """Stage lines (`lines`) and the training bar (`bar`); either may be off (the Python API: neither)."""

    def __init__(self, lines: bool = False, bar: bool = True) -> None:
        self.lines, self.bar_wanted = lines and first_process(), bar
        self.bar: Any = None  # the tqdm bar while training runs
        self.loss: float | None = None
        self.accuracy: float | None = None

    def stage(self, text: str) -> None:
        if not self.lines:
            return
        if self.bar is not None:  # a line written through the bar keeps the bar intact below it
            self.bar.write(PREFIX + text, file=sys.stderr)
        else:
            print(PREFIX + text, file=sys.stderr, flush=True)

    def validating(self, step: int, max_steps: int) -> None:
        if self.bar is not None:
            self._postfix("validating…")
        else:
            self.stage(f"validating at step {step} of {max_steps}")

    def validated(self, accuracy: float) -> None:
        self.accuracy = accuracy
        self._postfix()

    def _postfix(self, note: str | None = None) -> None:
        if self.bar is None:
            return
        parts = [f"loss={self.loss:.4g}"] if self.loss is not None else []
        parts += [f"val_acc={100 * self.accuracy:.1f}%"] if self.accuracy is not None else []
        self.bar.set_postfix_str(", ".join(parts + ([note] if note else [])))

    def callback(self) -> Any:
        """The Trainer callback that drives the bar and the `training` stage line (it knows max_steps)."""
        from transformers import TrainerCallback

        progress = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                progress.stage(f"training {state.max_steps} steps")
                if progress.bar_wanted and state.is_world_process_zero:
                    from tqdm.auto import tqdm

                    progress.bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True)
                    progress.bar.update(state.global_step)  # a resumed run starts where it stopped

            def on_step_end(self, args, state, control, **kw):
                if progress.bar is not None:
                    progress.bar.update(state.global_step - progress.bar.n)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    progress.loss = float(logs["loss"])
                    progress._postfix()

            def on_train_end(self, args, state, control, **kw):
                if progress.bar is not None:
                    progress.bar.close()
                    progress.bar = None

        return _Callback()
