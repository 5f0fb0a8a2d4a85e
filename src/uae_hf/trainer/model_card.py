"""What every UAE trainer's model card reads from the run: the latest logged numbers and the tags."""


def latest_metrics(log_history: list[dict]) -> dict[str, float]:
    """Each logged number's latest value (the epoch aside)."""
    latest = {}
    for record in log_history:
        latest.update({key: value for key, value in record.items() if isinstance(value, (int, float)) and key != "epoch"})
    return latest


def card_tags(own: list[str], tags) -> list[str]:
    """The trainer's own tags and the caller's (one tag or a list)."""
    return sorted(set(own) | set([tags] if isinstance(tags, str) else tags or []))
