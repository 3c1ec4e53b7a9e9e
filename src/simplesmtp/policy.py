"""Which recipients and senders are accepted, and what VRFY may say.

Checks return a ``Reply`` to refuse, or None to accept; the engine sends it
(the caller decides, the policy only judges).

Recipients, in order:

1. ``<postmaster>`` and ``postmaster@<local domain>`` are always accepted
   (RFC 5321 §4.5.1) and delivered to the configured postmaster account.
2. Without local domains, every recipient is accepted (the development
   default: each address gets its own mailbox).
3. At a local domain that has accounts, the account must exist
   (550 5.1.1); a local domain without any account is a catch-all.
4. Any other domain is accepted only from an authenticated session;
   otherwise 550 5.7.1: we are never an open relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from . import replies as R
from .address import Address, AddressError, parse_path, unquote_local
from .replies import Reply

if TYPE_CHECKING:
    from .engine import Transaction
    from .users import UserStore

RELAY_DENIED: Final = R.reply(550, "5.7.1", "Relaying denied: authenticate first")
UNKNOWN_USER: Final = R.reply(550, "5.1.1", "Mailbox unavailable: no such user here")
NOT_OWNER: Final = R.reply(553, "5.7.1", "Sender address not owned by the authenticated user")

VRFY_MODES: Final = ("off", "authenticated", "on")


def account_key(address: Address) -> str:
    """The lower-cased ``local@domain`` an account name is compared with."""
    return f"{unquote_local(address.local_part)}@{address.domain}".lower()


class RecipientPolicy:
    def __init__(self, *, local_domains: tuple[str, ...] = (),
                 users: UserStore | None = None, postmaster: str | None = None,
                 vrfy: str = "off", sender_must_match: bool = False) -> None:
        if vrfy not in VRFY_MODES:
            raise ValueError(f"vrfy must be one of {', '.join(VRFY_MODES)}")
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.users = users
        self.vrfy_mode = vrfy
        self.sender_must_match = sender_must_match
        postmaster_address: Address | None = None
        if postmaster:
            try:
                postmaster_address, rest = parse_path(f"<{postmaster}>", utf8=True)
            except AddressError:
                raise ValueError(f"postmaster {postmaster!r} is not an address") from None
        elif local_domains:
            postmaster_address = Address("postmaster", sorted(self.local_domains)[0])
        self.postmaster = postmaster_address

    @property
    def checks_recipients(self) -> bool:
        return bool(self.local_domains)

    def is_postmaster(self, address: Address) -> bool:
        if unquote_local(address.local_part).lower() != "postmaster":
            return False
        return not address.domain or address.domain.lower() in self.local_domains

    def _has_account(self, address: Address) -> bool:
        return self.users is not None and self.users.get(account_key(address)) is not None

    def _domain_has_accounts(self, domain: str) -> bool:
        return self.users is not None and self.users.has_domain(domain)

    def check_recipient(self, address: Address, txn: Transaction) -> Reply | None:
        return self.recipient_reply(address, authenticated=txn.auth_user is not None)

    def recipient_reply(self, address: Address, *, authenticated: bool) -> Reply | None:
        if self.is_postmaster(address) or not self.local_domains:
            return None
        domain = address.domain.lower()
        if domain in self.local_domains:
            if self._domain_has_accounts(domain) and not self._has_account(address):
                return UNKNOWN_USER
            return None
        return None if authenticated else RELAY_DENIED

    def delivery_address(self, address: Address) -> Address:
        """Where mail for ``address`` is stored (postmaster is redirected)."""
        if self.postmaster is not None and self.is_postmaster(address):
            return self.postmaster
        return address

    def check_sender(self, address: Address, user: str | None) -> Reply | None:
        """Submission (RFC 6409 §6.1): the reverse-path must be the user's."""
        if not self.sender_must_match or user is None or not address.domain:
            return None  # <> (a bounce) is not anybody's address
        return None if account_key(address) == user.lower() else NOT_OWNER

    def vrfy(self, text: str, user: str | None) -> Reply:
        """RFC 5321 §3.5.3: 250 for a known mailbox, 550 for an unknown one,
        252 when we will not (or cannot) tell."""
        if self.vrfy_mode == "off" or (self.vrfy_mode == "authenticated" and user is None):
            return R.VRFY_CANNOT
        address = _vrfy_address(text)
        if address is None:
            return R.VRFY_CANNOT
        domain = address.domain.lower()
        if domain not in self.local_domains or not self._domain_has_accounts(domain):
            return R.VRFY_CANNOT  # not ours, or a catch-all: cannot say more
        if self.users is not None:
            account = self.users.get(account_key(address))
            if account is not None:
                return R.reply(250, "2.1.5", f"<{account.name}>")
        return UNKNOWN_USER


def _vrfy_address(text: str) -> Address | None:
    text = text.strip()
    if not text.startswith("<"):
        text = f"<{text}>"
    try:
        address, rest = parse_path(text, utf8=True)
    except AddressError:
        return None
    return address if not rest.strip() else None
