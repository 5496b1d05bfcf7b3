"""Sans-IO NBD protocol core: fixed-newstyle handshake and transmission, both roles.

The socket belongs to the caller. Feed received bytes with ``receive_data(data)``
(``b""`` means end of file), pull events with ``next_event()`` until it returns ``None``
(more bytes needed), turn application events into bytes with ``send(event)``, and write
whatever ``data_to_send()`` returns after every ``receive_data``/``next_event`` round:
the core answers some things on its own (the greeting, option replies, error replies to
invalid requests), and those bytes collect there.

Theory of operation -- server (:class:`ServerConnection`)::

    GREETING --client flags--> OPTIONS --STARTTLS ack--> TLS_WAIT --tls_started()--> OPTIONS
    OPTIONS --GO ack / EXPORT_NAME reply--> TRANSMISSION --DISC / EOF--> CLOSED
    any state --ABORT / EOF / bad magic / malformed framing--> CLOSED

The server core answers every option itself from an :class:`ExportCatalog` (pure lookups,
no I/O) and only surfaces ``StartTLS``, ``Negotiated`` and ``Closed``. In transmission it
validates each request (magic, command, flags, range, payload size, read-only) and emits
only valid ones as :class:`Request`; invalid ones get the protocol's error reply queued in
``data_to_send()`` and never reach the application, so a write past the end can never be
performed. The payload of a rejected or oversized write is skipped, not buffered. Only
framing that cannot be resynchronised (bad magic) ends the session -- with a ``Closed``
event, never an exception.

Client (:class:`ClientConnection`)::

    GREETING --server greeting--> OPTIONS: [STARTTLS] STRUCTURED_REPLY [SET_META_CONTEXT] GO
    (GO unsupported: EXPORT_NAME) --> TRANSMISSION;  list mode: LIST then ABORT --> CLOSED

Options are sent one at a time; replies are matched to the option in flight. In
transmission, ``send(Command)`` may be called many times before any reply (pipelining);
structured reply chunks are assembled per handle and one :class:`Reply` is emitted when
the chunk flagged DONE arrives. A server that breaks the protocol raises
:class:`RemoteProtocolError` from ``next_event``.
"""

from __future__ import annotations

from edgevisor.proto.nbd_client_core import ClientConnection, ClientEvent
from edgevisor.proto.nbd_server_core import (
    ExportCatalog,
    ServerConnection,
    ServerEvent,
    TLSPolicy,
)
from edgevisor.proto.nbd_wire import (
    BlockStatusReply,
    Closed,
    Cmd,
    Command,
    Done,
    Errno,
    ErrorReply,
    ExportInfo,
    ExportList,
    HandshakeFailed,
    LocalProtocolError,
    NBDProtocolError,
    Negotiated,
    ReadReply,
    RemoteProtocolError,
    Reply,
    Request,
    StartTLS,
)

__all__ = [
    "BlockStatusReply",
    "ClientConnection",
    "ClientEvent",
    "Closed",
    "Cmd",
    "Command",
    "Done",
    "Errno",
    "ErrorReply",
    "ExportCatalog",
    "ExportInfo",
    "ExportList",
    "HandshakeFailed",
    "LocalProtocolError",
    "NBDProtocolError",
    "Negotiated",
    "ReadReply",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "ServerConnection",
    "ServerEvent",
    "StartTLS",
    "TLSPolicy",
]
