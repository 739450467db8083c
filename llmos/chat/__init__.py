"""Chat: personas, persistent sessions, memory under a token budget, dialogue strategies and
knowledge bases. Built on the text layer (llmos.llm) and the SQLite store (llmos.db)."""
