"""`tether dashboard`: a web dashboard over the admin API and the Kubernetes API (ASGI, Starlette).

Rooms: `settings` (what it is told), `views` and `rounds_view` (pure: MLTask objects and release
status documents become what a page shows), `sessions` (login cookie and CSRF tokens, pure),
`livehub` (one upstream poll per subject, fanned out to every page that shows it), `upstream` (the
only module that talks to the controller and the Kubernetes API), `subjects` (what each subject
fetches), `app` (routes and templates), `webserver` (uvicorn). Read-only unless rollout controls
are enabled; they patch the MLTask exactly as `tether rollout` does (`tether.common.rollout_controls`).
"""
