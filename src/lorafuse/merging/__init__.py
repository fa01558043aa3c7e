"""The merge: the engine (`merging.engine.merge`, also `lorafuse.merge`), its config (`merging.config`), the spaces
a merge runs in (`merging.spaces`: full; `merging.aligned`: knots, core), the method families (`merging.methods`)
and the low-rank algebra under them (`merging.algebra`).

The package is `merging`, not `merge`: `lorafuse.merge` is the function (a subpackage of that name would replace
it as the package's attribute on first import). Nothing is imported here, so that `merging.algebra` stays cheap
for the adapter readers below the engine."""
