"""Everything the service knows about talking to Proxmox VE, each helper once: the API client (`client`), PVE
tasks (`tasks`), who owns a VM (`ownership`), VM lookup and removal (`vms`), disk sizes (`disks`) and free
VMIDs (`vmids`). The activities and the repair tool both use these.

Nothing is imported here: `payloads` and workflow code import `pve.ownership`, which must not pull in
proxmoxer or requests."""
