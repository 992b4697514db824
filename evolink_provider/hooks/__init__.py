"""The EvoLink hook and what it is built from."""

#: The connection id the hook, operators and sensor use when none is given.
DEFAULT_CONN_ID = "evolink_default"
