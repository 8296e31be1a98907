"""What every stage shares: the user-error type, strict config loading, safe file writes, progress bars."""
