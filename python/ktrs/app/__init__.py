"""The ``ktrs`` command-line application (``ktrs demo|train|chat|bench|info|...``) and
what only it uses: the training loop over a JSONL chat file, the chat REPL, the tiny
built-in model and data of the demo, the loss plot. The library (``ktrs``) never imports
this package; it is built on the library's public API."""
