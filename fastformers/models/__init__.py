"""Models, their families and pruning: loading, the remote-code model class, the folder a pruned model is saved
as."""
