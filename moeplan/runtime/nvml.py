"""GPU topology through NVML (nvidia-ml-py): GPUs, memory, NVLink peers, PCIe and NUMA affinity.

`topology()` never raises: without the library, the driver or any GPU it returns
`{"available": False, "reason": ...}` and `moeplan profile` takes the CPU path.
"""

from __future__ import annotations


def topology() -> dict:
    try:
        import pynvml
    except ImportError as e:  # nvidia-ml-py is a dependency, but be explicit when it is missing
        return {"available": False, "reason": f"nvidia-ml-py is not importable: {e}"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"available": False, "reason": f"NVML could not start ({e}); no NVIDIA driver "
                                              "on this machine"}
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return {"available": False, "reason": "NVML sees no GPU"}
        gpus = [_gpu(pynvml, i) for i in range(count)]
        bus_to_index = {g["pci_bus_id"]: g["index"] for g in gpus}
        for g in gpus:
            buses = g.pop("_peer_buses")
            g["nvlink_links"] = len(buses)  # links to NVSwitch count here, but name no GPU peer
            g["nvlink_peers"] = sorted({bus_to_index.get(b, -1) for b in buses} - {-1})
        return {"available": True, "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "gpus": gpus}
    except pynvml.NVMLError as e:  # a GPU lost or a query refused: no topology, no crash
        return {"available": False, "reason": f"NVML could not describe the GPUs ({e})"}
    finally:
        pynvml.nvmlShutdown()


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _gpu(pynvml, i: int) -> dict:
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    info = {"index": i, "name": _text(pynvml.nvmlDeviceGetName(h)),
            "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
            "pci_bus_id": _text(pynvml.nvmlDeviceGetPciInfo(h).busId), "_peer_buses": []}
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(h, link):
                remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link)
                info["_peer_buses"].append(_text(remote.busId))
        except pynvml.NVMLError:
            break  # no more links (or no NVLink at all)
    try:
        info["numa_node"] = int(pynvml.nvmlDeviceGetNumaNodeId(h))
    except (pynvml.NVMLError, AttributeError):
        info["numa_node"] = None
    return info
