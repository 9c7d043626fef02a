"""Thin click commands: parse, call the library, print. No planning logic lives here."""
