"""What the routes do, as plain functions with keyword-only arguments (no HTTP types here)."""
