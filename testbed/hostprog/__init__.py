"""Host programs, whatever the backend: JSON-line RPC (rpc), the controller's client
and zipapp bundler (client, bundle), the host clock (timing), and the host-side
bookkeeping that keeps a machine clean (leases, guest slots).

What runs on a host imports only core and this package, under Python 3.9."""
