class DataError(ValueError):
    """Bad input data. The message is one line: `file:line: field: reason`."""
