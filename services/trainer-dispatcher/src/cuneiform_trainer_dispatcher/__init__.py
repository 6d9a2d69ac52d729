"""Cuneiform trainer-dispatcher: a batch's life after export."""
