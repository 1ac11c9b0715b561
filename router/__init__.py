"""`wattops-router`: one OpenAI-compatible endpoint for the fleet that sends each request to
the deployment meeting its route's quality and latency bounds at the lowest cost (or energy,
or carbon), falls back when one fails, and says on every answer where it went and why.
Headless; built on the fleet core (it follows the agents' event streams)."""
