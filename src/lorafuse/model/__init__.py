"""The model side: loading a base model (`model.models`), formulations (classify, chat), training
(`model.training`, `model.train_progress`), precision, applying updates and heads to a loaded model
(`model.apply`), the kinds of fused model an evaluator accepts (`model.kinds`) and evaluation
(`model.evaluation`). Nothing is imported here; import the modules."""
