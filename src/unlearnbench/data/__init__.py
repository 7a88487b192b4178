"""Data: built-in corpora and the prepare stage."""
