"""The run itself: the command line, the pipeline that composes the stages, sweeps and the stage cache."""
