"""Power sensors: NVML GPUs, Jetson INA3221 rails, RAPL CPU zones, and a utilisation estimate."""
