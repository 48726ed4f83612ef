"""Evaluation: what answers prompts (responders), the prompted baseline's format and outputs, the
judges (RM score, log-probs for KL), the comparison's metrics, and the report."""
