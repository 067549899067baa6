"""The asyncio side: listeners, MTA connections, signals, graceful drain."""
