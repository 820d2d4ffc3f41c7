"""The `blip` command line: wiring only. Each command parses options, calls one library function,
and renders its result; all logic lives in the library modules."""
