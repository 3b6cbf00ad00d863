"""Commands that are not training: generate, chat, explain."""
