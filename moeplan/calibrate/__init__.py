"""Calibration, the top floor: measures this host with the runtime and fits the measurements into a
cluster profile that the cost model reads (`moeplan profile`)."""
