"""Energy of a timed section, by the best method this machine offers, always named so a reader knows
what the number is: codecarbon (when installed), the CPU's RAPL counters (when readable), or an
*estimate* from the configured TDP × time. The meter is picklable: a benchmark instance reads it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
ESTIMATED = {"codecarbon": False, "rapl": False, "tdp_estimate": True}  # codecarbon may estimate internally too


def rapl_packages(root: Path = POWERCAP) -> list[Path]:
    """Readable package-level RAPL zones (`intel-rapl:N`, also used by AMD); their subzones are already
    counted in the package."""
    zones = []
    for zone in sorted(root.glob("intel-rapl:*")):
        if zone.name.count(":") == 1 and (zone / "energy_uj").is_file():
            try:
                int((zone / "energy_uj").read_text())
            except (OSError, ValueError):
                continue  # root-only on most kernels since 2020
            zones.append(zone)
    return zones


def choose_meter(tdp_watts: float | None, share: float = 1.0, root: Path = POWERCAP) -> EnergyMeter:
    """codecarbon, else RAPL, else a TDP estimate (scaled by the share of the machine's cores in use),
    else no energy figure at all."""
    if importlib.util.find_spec("codecarbon") is not None:
        return EnergyMeter("codecarbon")
    zones = rapl_packages(root)
    if zones:
        return EnergyMeter("rapl", zones=tuple(str(z) for z in zones))
    if tdp_watts:
        return EnergyMeter("tdp_estimate", tdp_watts=float(tdp_watts), share=share)
    return EnergyMeter("none")


@dataclass(frozen=True)
class EnergyMeter:
    method: str  # codecarbon | rapl | tdp_estimate | none
    zones: tuple[str, ...] = ()  # rapl: the package zones read
    tdp_watts: float | None = None  # tdp_estimate: power of the whole CPU at full load
    share: float = 1.0  # tdp_estimate: share of the CPU's cores the measured work used

    @property
    def estimated(self) -> bool:
        return ESTIMATED.get(self.method, False)

    def start(self):
        """A reading to hand back to stop()."""
        if self.method == "rapl":
            return [_read_uj(Path(zone)) for zone in self.zones]
        if self.method == "codecarbon":
            from codecarbon import OfflineEmissionsTracker

            tracker = OfflineEmissionsTracker(
                country_iso_code="USA", save_to_file=False, log_level="error", measure_power_secs=1
            )  # the country only affects CO2, not energy
            tracker.start()
            return tracker
        return None

    def stop(self, started, seconds: float) -> float | None:
        """Joules since start(); `seconds` is the section's wall time (what the estimate multiplies)."""
        if self.method == "rapl":
            return sum(_delta_uj(Path(zone), before) for zone, before in zip(self.zones, started)) / 1e6
        if self.method == "codecarbon":
            started.stop()
            return float(started.final_emissions_data.energy_consumed) * 3.6e6  # kWh -> J
        if self.method == "tdp_estimate" and self.tdp_watts is not None:
            return self.tdp_watts * self.share * seconds
        return None


def _read_uj(zone: Path) -> int:
    return int((zone / "energy_uj").read_text())


def _delta_uj(zone: Path, before: int) -> int:
    """The counter wraps at max_energy_range_uj."""
    after = _read_uj(zone)
    if after >= before:
        return after - before
    return after + int((zone / "max_energy_range_uj").read_text()) - before
