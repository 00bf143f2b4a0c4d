"""The benchmark stage's parts: `settings` (what is timed, the search the pick is made from), `workload`
(batches and their shares per instance), `timing` (interleaved passes), `analysis` (speed, accuracy, gate,
memory budget, the pick) and `table` (what is printed)."""
