"""Generated from proto/baton/v1 by generate.py; do not edit."""
