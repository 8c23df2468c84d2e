"""The results page: pick a mailing, see its funnel and the bot's answers, browse and download the rows.

Server-rendered (Jinja templates, plain CSS, charts as inline SVG): no JavaScript, no build step,
nothing fetched from the internet.

Auth: a session cookie after signing in with the API token, or HTTP Basic (receiver/auth.py).
"""
from __future__ import annotations

from urllib.parse import urlencode, urlsplit

from flask import (
    Blueprint,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)

from . import results, summaries
from .api import csv_response
from .auth import (
    SECRET_QUERY_NAMES,
    SESSION_HOURS,
    api_token_ok,
    cookie_name,
    cookie_secure,
    end_session,
    signed_in,
    start_session,
)
from .forwarding import stats
from .forwards_api import subscription_json

bp = Blueprint("pages", __name__)

PAGE_ROWS = 100
PUBLIC_ENDPOINTS = {"pages.login"}


@bp.before_request
def _guard():
    if any(name in request.args for name in SECRET_QUERY_NAMES):
        return _page("error.html", 400, message="Never put the token in the URL; sign in with the form.")
    if request.endpoint in PUBLIC_ENDPOINTS or signed_in():
        return None
    if request.authorization and request.authorization.type == "basic":
        return _page("error.html", 401, message="Wrong token.",
                     headers={"WWW-Authenticate": 'Basic realm="twin24-receiver"'})
    return redirect(url_for("pages.login", next=request.full_path.rstrip("?")))


@bp.after_request
def _private(response):
    response.headers.setdefault("Cache-Control", "private, no-store")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


def _page(template: str, status: int = 200, headers: dict | None = None, **context):
    response = make_response(render_template(template, **context), status)
    response.headers.update(headers or {})
    return response


def _safe_next(target: str | None) -> str:
    r"""Only a path on this site may be the place to go after signing in: anything else leads to the
    default page. Browsers read "\" as "/" and drop tabs and newlines ("/\t/evil.com" goes to
    //evil.com), and a control character in a Location header is a 500."""
    default = url_for("pages.results_page")
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(ch.isspace() or not ch.isprintable() for ch in target):
        return default
    parts = urlsplit(target)
    return default if parts.scheme or parts.netloc else target


@bp.route("/login", methods=["GET", "POST"])
def login():
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return _page("login.html", next=target)
    if not api_token_ok(request.form.get("token", "")):
        return _page("login.html", 401, next=target, error="That is not the API token.")
    response = redirect(target)
    response.set_cookie(cookie_name(), start_session(), max_age=SESSION_HOURS * 3600, path="/",
                        httponly=True, samesite="Lax", secure=cookie_secure())
    return response


@bp.post("/logout")
def logout():
    """Sign out: the session ends on the server, not only in this browser."""
    end_session()
    response = redirect(url_for("pages.login"))
    response.delete_cookie(cookie_name(), path="/", httponly=True, samesite="Lax", secure=cookie_secure())
    return response


@bp.get("/")
def index():
    return redirect(url_for("pages.results_page"))


def _page_filters():
    """The filters of the page: a `mailing` picked in the form ("c:<callbackData>" or "b:<bulkId>")
    becomes callbackData/bulkId; everything else is the API's own parameters."""
    args = request.args.copy()
    mailing = args.pop("mailing", "")
    if mailing[:2] == "c:":
        args.setlist("callbackData", [mailing[2:]])
        args.pop("bulkId", None)
    elif mailing[:2] == "b:":
        args.setlist("bulkId", [mailing[2:]])
        args.pop("callbackData", None)
    for name in list(args.keys()):          # an empty form field means "any"
        if not any(v.strip() for v in args.getlist(name)):
            args.pop(name)
    return results.Filters.from_args(args, allowed=("cursor", "excel"))


@bp.get("/results")
def results_page():
    try:
        filters = _page_filters()
        found = results.page(filters, limit=PAGE_ROWS, cursor=request.args.get("cursor") or None)
    except results.FilterError as error:
        return _page("error.html", 400, message=f"{error.param}: {error.detail}",
                     back=url_for("pages.results_page"))
    counted = summaries.summary(filters.mailing_only())
    summary = counted.summary
    keys = summary.keys
    rows = [results.flat_row(row, keys) for row in found.rows]
    args = filters.to_args()
    selected = (f"c:{filters.callback_data}" if filters.callback_data is not None
                else f"b:{filters.bulk_id}" if filters.bulk_id is not None else "")
    funnel = _chart([(key, label, count) for key, label, count in summary.funnel], summary.sent)
    answers = {key: _chart([(value, value, count) for value, count in values], summary.answered,
                           rest=summary.other.get(key))
               for key, values in summary.answers.items()}
    return _page(
        "results.html", filters=filters, summary=summary, keys=keys, rows=rows,
        funnel=funnel, answers=answers, lists=summary.lists,
        mailings=summaries.mailings() or results.mailings(), selected=selected, as_of=counted.as_of, stages=results.STAGES, forwards=_forwards(),
        statuses=sorted(summary.statuses),
        next_url=url_for("pages.results_page", **args, cursor=found.next_cursor) if found.next_cursor else None,
        first_url=url_for("pages.results_page", **args) if request.args.get("cursor") else None,
        csv_url=url_for("pages.results_csv") + ("?" + urlencode(args) if args else ""),
        excel_url=url_for("pages.results_csv") + "?" + urlencode({**args, "excel": "1"}),
    )


def _forwards() -> list[dict]:
    """The webhooks' counts for the page's box (its URLs without passwords); empty without subscriptions."""
    return [subscription_json(row) for row in stats()]


def _chart(items, total: int, rest: tuple[int, int] | None = None) -> list[dict]:
    """Bars for a chart: each with its count, its share of `total`, and its length (of the longest);
    `rest` (distinct values, count) not shown one by one becomes a last "(other)" bar."""
    if rest:
        values, count = rest
        items = [*items, ("(other)", f"({values} other values)", count)]
    longest = max((count for _, _, count in items), default=0)
    return [{"key": key, "label": label, "count": count,
             "percent": round(100 * count / total) if total else 0,
             "length": count / longest if longest else 0}
            for key, label, count in items]


@bp.get("/results.csv")
def results_csv():
    """The download link of the page: the same CSV as /api/results.csv, signed in with the cookie.
    Formulas are always defused here: a person opens this file in a spreadsheet (`raw` is the API's)."""
    try:
        filters = _page_filters()
    except results.FilterError as error:
        return _page("error.html", 400, message=f"{error.param}: {error.detail}")
    excel = request.args.get("excel", "").lower() in ("1", "true", "yes", "on")
    return csv_response(filters, excel=excel, filename=(filters.callback_data or filters.bulk_id or "results"))
