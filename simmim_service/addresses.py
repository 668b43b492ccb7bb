"""Which network addresses the service may send requests to on a user's behalf (SSRF).

A webhook URL is chosen by whoever holds an API key, and the API process POSTs to it. With
``SIMMIM_WEBHOOK_ALLOW_PRIVATE=false`` only globally routable addresses are allowed: not
loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16, where cloud
metadata services answer), carrier-grade NAT, multicast, reserved or unspecified ones. A name
is resolved and every address it resolves to must be allowed; the connection then goes to an
address that was checked (see ``simmim_service.webhooks``), so a name that changes its answer
between the check and the connection (DNS rebinding) gains nothing.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["AddressRefused", "checked_addresses", "is_public"]


class AddressRefused(Exception):
    """The host does not resolve, or resolves to an address requests may not go to."""


def is_public(address: str) -> bool:
    """Whether ``address`` (an IP literal) is globally routable unicast."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def checked_addresses(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The addresses ``host`` resolves to, in resolver order, all of them allowed.

    Raises:
        AddressRefused: If ``host`` does not resolve, or (unless ``allow_private``) any of its
            addresses is not public: the message names the host and the address.
    """
    host = host.strip("[]")  # an IPv6 literal as URLs write it
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise AddressRefused(f"cannot resolve {host}: {err}") from err
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                shown = host if host == address else f"{host} resolves to {address}, which"
                raise AddressRefused(f"{shown} is not a public address; this deployment sends webhooks only "
                                     "to public addresses (SIMMIM_WEBHOOK_ALLOW_PRIVATE=false)")
    return addresses
