"""Emails: rendering from templates, the backends that send them, one delivery's journey."""
