"""The head node's SSH side: an inventory of GPU nodes driven over Fabric.

    inventory.py  cluster.toml: labels, hosts, paths on the nodes (one-line errors)
    remote.py     RemoteNode: one node over one SSH connection (start/close/run)
    group.py      Cluster: label -> RemoteNode, one action on every node in parallel
    sync.py       files both ways over SFTP (hash-compared push, size-skipping fetch)
    workers.py    a node's worker: up, down, status, logs, systemd unit
    deploy.py     scripts, data and the project itself onto the nodes
    outputs.py    node-local storage: inputs pushed before a run, outputs fetched after

Importing this package loads nothing; Fabric is imported by the modules that use it.
"""
