"""Content safety: a policy of categories and actions, detectors (rules, word lists, personal
data with checksums, a sentence classifier on the embedder), checks on whole texts and on
streams, OpenAI-shaped moderation results and an audit log in the store. See docs/safety.md."""

from llmos.safety.audit import list_audit, record_audit
from llmos.safety.detectors import Finding
from llmos.safety.pii import cn_id_check_char, cn_id_ok, luhn_ok, ssn_ok
from llmos.safety.guard import StreamGuard, Verdict, check_text
from llmos.safety.moderation import OPENAI_CATEGORIES, moderate
from llmos.safety.policy import ACTIONS, CATEGORIES, Policy, PolicyError, default_policy_text, load_policy

__all__ = [
    "ACTIONS", "CATEGORIES", "OPENAI_CATEGORIES", "Finding", "Policy", "PolicyError", "StreamGuard", "Verdict",
    "check_text", "cn_id_check_char", "cn_id_ok", "default_policy_text", "list_audit", "load_policy", "luhn_ok",
    "moderate", "record_audit", "ssn_ok",
]
