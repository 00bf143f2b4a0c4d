"""Reading data and tasks: the SuperGLUE tasks and your own files, their metrics, splits and loaders."""
