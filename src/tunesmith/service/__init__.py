"""The self-hosted fine-tuning service: the OpenAI fine-tuning API over tunesmith."""
