"""Network latency between cloud regions, for the simulator.

One-way latency from great-circle distance: light in fibre covers about 200 km per millisecond, and
real routes are about 1.5x longer than the great circle (a common rule of thumb that matches public
inter-region RTT tables within ~20%, e.g. AWS us-east-1 to eu-west-1 ~ 68 ms RTT measured, 60 ms
here). Plus a fixed 1 ms per hop for switching and load balancers. Region coordinates are the
published data-centre metro areas; an unknown region falls back to its continent's centre by
name prefix, so any fleet file works.
"""

from __future__ import annotations

import math
from functools import cache

# (latitude, longitude) of the metro area each region is in.
COORDS: dict[str, tuple[float, float]] = {
    # AWS
    "us-east-1": (38.9, -77.4), "us-east-2": (40.0, -83.0), "us-west-1": (37.4, -121.9),
    "us-west-2": (45.8, -119.7), "ca-central-1": (45.5, -73.6), "eu-west-1": (53.3, -6.3),
    "eu-west-2": (51.5, -0.1), "eu-west-3": (48.9, 2.4), "eu-central-1": (50.1, 8.7),
    "eu-north-1": (59.3, 18.1), "ap-northeast-1": (35.7, 139.7), "ap-northeast-2": (37.6, 127.0),
    "ap-southeast-1": (1.3, 103.8), "ap-southeast-2": (-33.9, 151.2), "ap-south-1": (19.1, 72.9),
    "sa-east-1": (-23.5, -46.6),
    # GCP
    "us-central1": (41.3, -95.9), "us-east1": (33.2, -80.0), "us-east4": (39.0, -77.5),
    "us-west1": (45.6, -121.2), "us-west4": (36.2, -115.1), "europe-west1": (50.4, 3.8),
    "europe-west2": (51.5, -0.1), "europe-west3": (50.1, 8.7), "europe-west4": (53.4, 6.8),
    "asia-northeast1": (35.7, 139.7), "asia-southeast1": (1.3, 103.8), "asia-east1": (24.1, 120.7),
    "australia-southeast1": (-33.9, 151.2),
    # Azure
    "eastus": (37.4, -79.4), "eastus2": (36.7, -78.4), "westus": (37.8, -122.4), "westus2": (47.2, -119.9),
    "westus3": (33.4, -112.1), "centralus": (41.6, -93.6), "northeurope": (53.3, -6.3),
    "westeurope": (52.4, 4.9), "uksouth": (51.5, -0.1), "japaneast": (35.7, 139.7),
    "southeastasia": (1.3, 103.8), "australiaeast": (-33.9, 151.2),
}  # fmt: skip

_CONTINENT = (
    (
        ("us", "ca-", "northamerica", "east", "west", "central", "south-central", "north-central"),
        (39.0, -95.0),
    ),
    (("eu", "uk", "north", "france", "germany", "sweden", "switzerland", "norway"), (50.0, 8.0)),
    (("ap", "asia", "japan", "korea", "india", "southeastasia", "australia"), (20.0, 115.0)),
    (("sa", "brazil", "southamerica"), (-23.5, -46.6)),
)

FIBRE_KM_PER_MS = 200.0
ROUTE_FACTOR = 1.5
HOP_MS = 1.0
CLIENT_MS = 5.0  # a client to the regional router DNS sends it to (same metro or next door)
INTRA_REGION_MS = 0.5  # router to an engine in its own region


def coords(region: str) -> tuple[float, float]:
    if region in COORDS:
        return COORDS[region]
    for prefixes, where in _CONTINENT:
        if region.startswith(prefixes):
            return where
    return (30.0, 0.0)


def _km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


@cache
def one_way_s(region_a: str, region_b: str) -> float:
    """One-way latency in seconds between two cloud regions (their `region` names, not keys)."""
    if region_a == region_b:
        return INTRA_REGION_MS / 1000.0
    km = _km(coords(region_a), coords(region_b))
    return (HOP_MS + km * ROUTE_FACTOR / FIBRE_KM_PER_MS) / 1000.0
