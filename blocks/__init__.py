"""Credentials and storage locations, kept in Prefect blocks and referred to by block name only."""
