"""Console-script entry points (`dsembed-*`); each module has `main(argv) -> int` and `cli()`."""
