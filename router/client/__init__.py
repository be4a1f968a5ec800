"""The worker client: requests on the workers' sessions, their events and errors, retries and
migration."""
