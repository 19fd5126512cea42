"""Consumer lag: the rules (pure), the measurements (I/O) and the page and metrics that show them."""
