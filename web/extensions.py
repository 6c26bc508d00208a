"""Flask extensions, created unbound here and bound to the app in create_app."""

from __future__ import annotations

from flask_limiter import Limiter
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

from web.ratelimit import client_address

csrf = CSRFProtect()
login_manager = LoginManager()
# No default limit: only the routes that carry one (sign-in, uploads, the JSON API) are limited, so health,
# metrics and the dashboard's polling are never starved. Storage and strategy come from create_app.
limiter = Limiter(key_func=client_address)
