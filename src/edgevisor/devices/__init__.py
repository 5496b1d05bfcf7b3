"""Coordinated devices on an agent: MQTT broker and auth/ACL, routes, shadows, timers, spool.

Modules (pure cores first, I/O at the edges):

- ``topics``     MQTT 3.1.1 topic names/filters, matching, filter coverage; the topic scheme
- ``routes``     the route table: ``RouteTable.match(message) -> list[Action]`` (pure)
- ``shadows``    shadow documents, patches, deltas, conflict rule (pure) + SQLite store
- ``timers``     cron timers: ``TimerCore.due(now)`` (pure) + store + async runner
- ``registry``   devices, scrypt credential hashes, ACLs (+ route grants)
- ``spool``      bounded durable FIFO for the controller, drop policy with counters
- ``broker``     embedded amqtt broker with registry auth/ACL plugins
- ``client``     the agent's MQTT client (embedded broker or an external one)
- ``service``    ``DeviceService`` wiring all of it; ``DevicesSettings``
"""
