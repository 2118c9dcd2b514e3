"""How each step of the fine-tuning pipeline is done: plain functions plus thin Prefect task wrappers."""
