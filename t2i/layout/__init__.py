"""Layouts: where each object of a picture goes (boxes with phrases), planned from a caption or given
by the user, and the networks that plan and render them (issue 17)."""
