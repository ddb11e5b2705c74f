"""FLIP task bundle package."""
