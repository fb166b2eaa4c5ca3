"""ldap3 reads responses ``SOCKET_SIZE`` bytes at a time and appends each piece to
a bytes object (quadratic in the response's size). The directory adapter raises
the read size so a large group's member list is read in far fewer pieces: at the
default 4 KiB a 50,000-member group took 7.5 s to read from Samba, at 64 KiB 1.4 s
(bench/pipeline.py shows the event cost)."""

from __future__ import annotations

from ldap3.utils.config import get_config_parameter

from writeback.adapters import directory


def test_the_adapter_reads_ldap_responses_in_pieces_of_at_least_a_tls_record() -> None:
    assert directory.LDAP_SOCKET_SIZE >= 16 * 1024  # one TLS record's worth at least
    assert get_config_parameter("SOCKET_SIZE") >= directory.LDAP_SOCKET_SIZE
