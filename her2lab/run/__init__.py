"""The tasks behind the entry points, each one function: prepare, extract, train, evaluate; and
their glue (loggers, the encoder step, explanations, the sweep summary)."""
