"""The wattops node agent: runs engines, serves the gateway, carries out control actions."""
