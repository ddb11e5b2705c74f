"""Disclosure control, what may leave the site: thresholds and complementary suppression of count tables
(``suppression``), the output guard over what a task produced (``guard``), differential privacy and its
budget (``privacy``)."""
