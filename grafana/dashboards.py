"""Grafana dashboards for connect-usage-exporter, generated with grafana-foundation-sdk.

    python grafana/dashboards.py          # (re)write grafana/dashboards/*.json and the chart's copy
    python grafana/dashboards.py --check  # exit 1 if a committed JSON file is out of date

The JSON under ``grafana/dashboards/`` is what Grafana provisioning and the docker-compose
setup load; ``helm/connect-usage-exporter/dashboards/`` holds a byte-identical copy because Helm
cannot read files outside the chart (``tests/test_dashboards.py`` checks both).

Query conventions (the metric contract is the table in docs/design.md):

- every selector carries ``job=~"$job", instance=~"$instance"``;
- two exporter replicas serve the same counts, so usage is de-duplicated with
  ``max without (instance, pod)`` before anything is summed; exporter-health panels stay per
  instance;
- content names come from ``connect_usage_content_info`` joined with
  ``* on (content_guid) group_left (content_name)``; ``topk by (content_guid) (1, …)`` keeps
  the join one-to-one even while two replicas briefly disagree about a renamed item.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders import prometheus as pq
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIRS = (
    ROOT / "grafana" / "dashboards",
    ROOT / "helm" / "connect-usage-exporter" / "dashboards",
)

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'job=~"$job", instance=~"$instance"'
CONTENT = 'content_guid="$content"'
TAGS = ["connect-usage-exporter", "posit-connect"]
QUANTILES = (0.5, 0.9, 0.99)


def dedup(expr: str) -> str:
    """Collapse the identical series two exporter replicas serve."""
    return f"max without (instance, pod) ({expr})"


def with_names(expr: str, where: str = "") -> str:
    """Join content names from the _info metric onto a vector labelled by content_guid (only
    the items `where` selects, e.g. `, app_mode!="deleted"`)."""
    return (
        f"({expr}) * on (content_guid) group_left (content_name) "
        f"topk by (content_guid) (1, connect_usage_content_info{{{SEL}{where}}})"
    )


def query(
    expr: str, legend: str = "", *, ref: str = "A", instant: bool = False, fmt: str = ""
) -> pq.Dataquery:
    q = pq.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant()
    if fmt:
        q = q.format(PromQueryFormat(fmt))
    return q


def queries(*items: tuple[str, str]) -> list[pq.Dataquery]:
    return [query(expr, legend, ref=chr(ord("A") + i)) for i, (expr, legend) in enumerate(items)]


def ts(
    title: str, targets: list[pq.Dataquery], unit: str = "short", *, w: int = 12, h: int = 8
) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .targets(targets)
        .unit(unit)
        .span(w)
        .height(h)
        .fill_opacity(10)
        .legend(
            cb.VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )


def st(
    title: str, targets: list[pq.Dataquery], unit: str = "short", *, w: int = 6, h: int = 4
) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .targets(targets)
        .unit(unit)
        .span(w)
        .height(h)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def tbl(title: str, expr: str, *, w: int = 12, h: int = 8) -> table.Panel:
    return (
        table.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .with_target(query(expr, instant=True, fmt="table"))
        .span(w)
        .height(h)
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True, "__name__": True}},
            )
        )
    )


def variables(*, content: bool = False) -> list[cogbuilder.Builder[dm.VariableModel]]:
    out: list[cogbuilder.Builder[dm.VariableModel]] = [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        db.QueryVariable("job")
        .label("Job")
        .datasource(DATASOURCE)
        .query("label_values(connect_usage_up, job)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".+"),
        db.QueryVariable("instance")
        .label("Instance")
        .datasource(DATASOURCE)
        .query('label_values(connect_usage_up{job=~"$job"}, instance)')
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".+"),
    ]
    if content:
        # Shown by name, valued by GUID: names are not unique across owners, GUIDs are.
        out.append(
            db.QueryVariable("content")
            .label("Content")
            .datasource(DATASOURCE)
            .query(
                "query_result(max by (content_guid, content_name) "
                f'(connect_usage_content_info{{{SEL}, app_mode!="deleted"}}))'
            )
            .regex('/content_guid="(?<value>[^"]+)",content_name="(?<text>[^"]+)"/')
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
        )
    return out


def new_dashboard(uid: str, title: str, description: str, *, content: bool = False) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .editable()
        .refresh("1m")
        .time("now-7d", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .variables(variables(content=content))
        .link(
            db.DashboardLink("Connect usage")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["connect-usage-exporter"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )


def merged(title: str, exprs: list[str], *, w: int = 12, h: int = 8) -> table.Panel:
    """A table of several instant queries joined on their labels (one column per query)."""
    targets = [
        query(expr, ref=chr(ord("A") + i), instant=True, fmt="table")
        for i, expr in enumerate(exprs)
    ]
    return (
        table.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .targets(targets)
        .span(w)
        .height(h)
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True, "__name__": True}},
            )
        )
    )


def by_username(expr: str) -> str:
    """A vector labelled by user_guid, with the user's name joined from user_info."""
    return (
        f"max by (user_guid, username) (({expr}) * on (user_guid) group_left (username) "
        f"max by (user_guid, username) (connect_usage_user_info{{{SEL}}}))"
    )


# Connect's now as the exporter last evaluated the windows: "ago" in one clock.
CONNECT_NOW = f"scalar(max(connect_usage_windows_evaluated_timestamp_seconds{{{SEL}}}))"
SHINY_MODES = "shiny|python-shiny|quarto-shiny|rmd-shiny"  # as exporter.snapshot.SHINY_APP_MODES


def usage_overview() -> db.Dashboard:
    sessions_rate = dedup(f"rate(connect_usage_shiny_sessions_total{{{SEL}}}[$__rate_interval])")
    visits_rate = dedup(f"rate(connect_usage_content_visits_total{{{SEL}}}[$__rate_interval])")
    buckets = f"connect_usage_shiny_session_duration_seconds_bucket{{{SEL}}}"
    visits_7d = f"sum({dedup(f'increase(connect_usage_content_visits_total{{{SEL}}}[7d])')})"
    visits_7d_before = visits_7d.replace("[7d]", "[7d] offset 1w")
    visits_last_week = visits_rate.replace("[$__rate_interval]", "[$__rate_interval] offset 1w")
    sessions_7d = f"sum({dedup(f'increase(connect_usage_shiny_sessions_total{{{SEL}}}[7d])')})"
    sessions_7d_before = sessions_7d.replace("[7d]", "[7d] offset 1w")
    return (
        new_dashboard(
            "connect-usage-overview",
            "Connect usage / Overview",
            "Posit Connect usage: sessions, visits, active users, top content, durations.",
        )
        .with_variable(
            db.CustomVariable("unused_days")
            .label("Unused for (days)")
            .values("7,14,30,60,90")
            .current(
                dm.VariableOption(
                    selected=True, text=UNUSED_DAYS_DEFAULT, value=UNUSED_DAYS_DEFAULT
                )
            )
        )
        .with_row(db.Row("Activity"))
        .with_panel(
            st(
                "Active users",
                [query(f"max by (window) (connect_usage_active_users{{{SEL}}})", "{{window}}")],
                w=12,
            ).description("Distinct known users with a session or visit in the window.")
        )
        .with_panel(
            st(
                "Live Shiny sessions",
                [query(f"sum({dedup(f'connect_usage_shiny_sessions_active{{{SEL}}}')})")],
            )
        )
        .with_panel(
            st(
                "Content items",
                [query(f"sum({dedup(f'connect_usage_content_items{{{SEL}}}')})")],
                w=3,
            )
        )
        .with_panel(
            st(
                "Shiny apps",
                [
                    query(
                        "sum("
                        + dedup(f'connect_usage_content_items{{{SEL}, app_mode=~"{SHINY_MODES}"}}')
                        + ")"
                    )
                ],
                w=3,
            ).description(
                "Content items whose app mode is a Shiny one (R, Python, Quarto, R Markdown)."
            )
        )
        .with_panel(
            ts(
                "Sessions and visits per hour",
                queries(
                    (f"sum({sessions_rate}) * 3600", "Shiny sessions started"),
                    (f"sum({visits_rate}) * 3600", "Content visits"),
                ),
            )
        )
        .with_panel(
            ts(
                "Active users",
                [query(f"max by (window) (connect_usage_active_users{{{SEL}}})", "{{window}}")],
            )
        )
        .with_row(db.Row("Top content"))
        .with_panel(
            tbl(
                "Top content by Shiny sessions (time range)",
                "topk(10, "
                + with_names(
                    "sum by (content_guid) ("
                    + dedup(f"increase(connect_usage_shiny_sessions_total{{{SEL}}}[$__range])")
                    + ")"
                )
                + ")",
            )
        )
        .with_panel(
            tbl(
                "Top content by unique viewers (7 days)",
                "topk(10, "
                + with_names(
                    "max by (content_guid) "
                    f'(connect_usage_content_active_users{{{SEL}, window="7d"}})'
                )
                + ")",
            )
        )
        .with_panel(
            tbl(
                "Top content by visits (time range)",
                "topk(10, "
                + with_names(
                    "sum by (content_guid) ("
                    + dedup(f"increase(connect_usage_content_visits_total{{{SEL}}}[$__range])")
                    + ")"
                )
                + ")",
            )
        )
        .with_panel(
            tbl(
                "Top apps by average Shiny session duration (time range)",
                "topk(10, "
                + with_names(
                    "sum by (content_guid) ("
                    + dedup(
                        "increase(connect_usage_shiny_session_duration_seconds_sum"
                        f"{{{SEL}}}[$__range])"
                    )
                    + ") / sum by (content_guid) ("
                    + dedup(
                        "increase(connect_usage_shiny_session_duration_seconds_count"
                        f"{{{SEL}}}[$__range])"
                    )
                    + ") > 0"
                )
                + ")",
            )
        )
        .with_row(db.Row("Top users"))
        .with_panel(
            merged(
                "Top users by Shiny sessions and visits (7 days)",
                [
                    by_username(f'connect_usage_user_sessions{{{SEL}, window="7d"}}'),
                    by_username(f'connect_usage_user_visits{{{SEL}, window="7d"}}'),
                ],
            ).description("Columns: Shiny sessions started, visits (CONNECT_EXPORTER_TOP_USERS).")
        )
        .with_panel(
            merged(
                "Top users by Shiny sessions and visits (30 days)",
                [
                    by_username(f'connect_usage_user_sessions{{{SEL}, window="30d"}}'),
                    by_username(f'connect_usage_user_visits{{{SEL}, window="30d"}}'),
                ],
            )
        )
        .with_row(db.Row("Shiny session duration"))
        .with_panel(
            ts(
                "Session duration quantiles",
                queries(
                    *(
                        (
                            f"histogram_quantile({q}, sum by (le) "
                            f"({dedup(f'rate({buckets}[$__rate_interval])')}))",
                            f"p{round(q * 100)}",
                        )
                        for q in QUANTILES
                    )
                ),
                "s",
            )
        )
        .with_panel(
            heatmap.Panel()
            .title("Session duration distribution")
            .datasource(DATASOURCE)
            .with_target(
                query(
                    "sum by (le) ("
                    + dedup(
                        "increase(connect_usage_shiny_session_duration_seconds_bucket"
                        f"{{{SEL}}}[$__rate_interval])"
                    )
                    + ")",
                    "{{le}}",
                    fmt="heatmap",
                )
            )
            .calculate(False)
            .y_axis(heatmap.YAxisConfig().unit("s"))
            .cell_values(heatmap.CellValues().unit("short"))
            .span(12)
            .height(8)
        )
        .with_row(db.Row("Inventory"))
        .with_panel(
            tbl(
                "Content by type and access",
                "sum by (app_mode, access_type) ("
                + dedup(f"connect_usage_content_items{{{SEL}}}")
                + ")",
            )
        )
        .with_panel(
            tbl(
                "Users by role and state",
                f"max by (role, state) (connect_usage_users{{{SEL}}})",
            )
        )
        .with_panel(
            tbl(
                "Content by owner",
                "sort_desc(count by (owner) (max by (content_guid, owner) "
                f'(connect_usage_content_info{{{SEL}, app_mode!="deleted"}})))',
            )
        )
        .with_panel(
            tbl(
                "Content unused for $unused_days days (days since its last use, or since its "
                "creation if never used)",
                "sort_desc(("
                + with_names(
                    f"({CONNECT_NOW} - max by (content_guid) "
                    f"(connect_usage_content_last_activity_timestamp_seconds{{{SEL}}})) / 86400",
                    ', app_mode!="deleted"',  # a deleted item keeps its usage, not its place here
                )
                + " > $unused_days) or ("
                + with_names(
                    f"({CONNECT_NOW} - max by (content_guid) "
                    f"(connect_usage_content_created_timestamp_seconds{{{SEL}}})) / 86400 unless "
                    "on (content_guid) "
                    f"connect_usage_content_last_activity_timestamp_seconds{{{SEL}}}",
                    ', app_mode!="deleted"',
                )
                + " > $unused_days))",
            )
        )
        .with_row(db.Row("Week over week"))
        .with_panel(
            st(
                "Visits, last 7 days vs the 7 days before",
                [query(f"{visits_7d} / {visits_7d_before} - 1")],
                "percentunit",
            )
        )
        .with_panel(
            st(
                "Shiny sessions, last 7 days vs the 7 days before",
                [query(f"{sessions_7d} / {sessions_7d_before} - 1")],
                "percentunit",
            )
        )
        .with_panel(
            ts(
                "Visits per hour: this week and last week",
                queries(
                    (f"sum({visits_rate}) * 3600", "this week"),
                    (f"sum({visits_last_week}) * 3600", "a week earlier"),
                ),
            )
        )
    )


def content_detail() -> db.Dashboard:
    sel = f"{SEL}, {CONTENT}"
    buckets = f"connect_usage_shiny_session_duration_seconds_bucket{{{sel}}}"
    return (
        new_dashboard(
            "connect-usage-content",
            "Connect usage / Content detail",
            "One Connect content item, chosen by name: sessions, viewers, durations, access.",
            content=True,
        )
        .with_panel(
            tbl(
                "Content",
                f"topk by (content_guid) (1, connect_usage_content_info{{{sel}}})",
                w=24,
                h=4,
            )
        )
        .with_panel(
            st(
                # Both sides in Connect's clock: right even when it differs from Grafana's.
                "Last activity (ago)",
                [
                    query(
                        f"max(connect_usage_windows_evaluated_timestamp_seconds{{{SEL}}})"
                        " - max(connect_usage_content_last_activity_timestamp_seconds"
                        f"{{{sel}}})"
                    )
                ],
                "s",
            )
        )
        .with_panel(
            st(
                "Unique viewers",
                [
                    query(
                        f"max by (window) (connect_usage_content_active_users{{{sel}}})",
                        "{{window}}",
                    )
                ],
                w=8,
            )
        )
        .with_panel(
            st(
                "Live Shiny sessions",
                [query(f"sum({dedup(f'connect_usage_shiny_sessions_active{{{sel}}}')})")],
                w=5,
            )
        )
        .with_panel(
            st(
                "Sessions and visits (time range)",
                queries(
                    (
                        f"sum({dedup(f'increase(connect_usage_shiny_sessions_total{{{sel}}}[$__range])')})",
                        "sessions",
                    ),
                    (
                        f"sum({dedup(f'increase(connect_usage_content_visits_total{{{sel}}}[$__range])')})",
                        "visits",
                    ),
                ),
                w=5,
            )
        )
        .with_panel(
            ts(
                "Sessions and visits per hour",
                queries(
                    (
                        "sum("
                        + dedup(
                            f"rate(connect_usage_shiny_sessions_total{{{sel}}}[$__rate_interval])"
                        )
                        + ") * 3600",
                        "Shiny sessions started",
                    ),
                    (
                        "sum("
                        + dedup(
                            f"rate(connect_usage_content_visits_total{{{sel}}}[$__rate_interval])"
                        )
                        + ") * 3600",
                        "visits",
                    ),
                ),
            )
        )
        .with_panel(
            ts(
                "Live Shiny sessions",
                [query(f"sum({dedup(f'connect_usage_shiny_sessions_active{{{sel}}}')})", "live")],
            )
        )
        .with_panel(
            ts(
                "Session duration quantiles",
                queries(
                    *(
                        (
                            f"histogram_quantile({q}, sum by (le) "
                            f"({dedup(f'rate({buckets}[$__rate_interval])')}))",
                            f"p{round(q * 100)}",
                        )
                        for q in QUANTILES
                    )
                ),
                "s",
            )
        )
        .with_panel(viewers_table("Viewers, last 7 days", sel, "7d"))
        .with_panel(viewers_table("Viewers, last 30 days", sel, "30d"))
        .with_panel(
            tbl(
                "Who has access (principals by type and role)",
                f"max by (principal_type, role) (connect_usage_content_permissions{{{sel}}})",
            )
        )
        .with_panel(
            tbl(
                # access_type all or logged_in: everyone (logged in) besides these principals.
                "Who has access, by name (and everyone, when access is all or logged_in)",
                _ACCESS_BY_NAME.format(sel=sel, SEL=SEL),
                w=24,
            )
        )
        .with_panel(
            tbl(
                "Members of the groups with access (CONNECT_EXPORTER_GROUP_MEMBERS)",
                _GROUP_MEMBERS_WITH_ACCESS.format(sel=sel, SEL=SEL),
                w=24,
            )
        )
    )


def viewers_table(title: str, sel: str, window: str) -> table.Panel:
    """The item's top viewers by name: sessions, time in sessions, visits, last seen (ago)."""
    viewer = f'{sel}, window="{window}"'
    return merged(
        title,
        [
            by_username(f"connect_usage_content_viewer_sessions{{{viewer}}}"),
            by_username(f"connect_usage_content_viewer_session_seconds{{{viewer}}}"),
            by_username(f"connect_usage_content_viewer_visits{{{viewer}}}"),
            # Last seen is one series a viewer in any window's top: this window's viewers only.
            by_username(
                f"({CONNECT_NOW} - connect_usage_content_viewer_last_seen_timestamp_seconds"
                f"{{{sel}}}) and on (user_guid) (connect_usage_content_viewer_sessions{{{viewer}}}"
                f" or connect_usage_content_viewer_visits{{{viewer}}})"
            ),
        ],
    ).description(
        "Columns: Shiny sessions started, seconds in sessions that ended, visits, seconds since "
        "last seen (Connect's clock). The item's top CONNECT_EXPORTER_TOP_VIEWERS viewers."
    )


# A principal's name from user_info or group_info (principal_guid joined on their guid), and the
# item's access_type as an "everyone" row when it opens the item to all or to every user.
_ACCESS_BY_NAME = (
    "max by (principal_type, name, role) ("
    "label_replace("
    'connect_usage_content_access_info{{{sel}, principal_type="user"}}'
    " * on (principal_guid) group_left (username) label_replace("
    "max by (user_guid, username) (connect_usage_user_info{{{SEL}}}),"
    ' "principal_guid", "$1", "user_guid", "(.+)"),'
    ' "name", "$1", "username", "(.+)")'
    " or label_replace("
    'connect_usage_content_access_info{{{sel}, principal_type="group"}}'
    " * on (principal_guid) group_left (group_name) label_replace("
    "max by (group_guid, group_name) (connect_usage_group_info{{{SEL}}}),"
    ' "principal_guid", "$1", "group_guid", "(.+)"),'
    ' "name", "$1", "group_name", "(.+)")'
    " or label_replace(label_replace("
    'max by (access_type) (connect_usage_content_info{{{sel}, access_type=~"all|logged_in"}}),'
    ' "name", "everyone ($1)", "access_type", "(.+)"),'
    ' "principal_type", "everyone", "", ""))'
)


# The users in each group that has a grant on the item, by group and user name.
_GROUP_MEMBERS_WITH_ACCESS = (
    "max by (group_name, username, role) ("
    "connect_usage_group_member_info{{{SEL}}}"
    " * on (group_guid) group_left (role) label_replace(max by (principal_guid, role) ("
    'connect_usage_content_access_info{{{sel}, principal_type="group"}}),'
    ' "group_guid", "$1", "principal_guid", "(.+)")'
    " * on (group_guid) group_left (group_name)"
    " max by (group_guid, group_name) (connect_usage_group_info{{{SEL}}})"
    " * on (user_guid) group_left (username)"
    " max by (user_guid, username) (connect_usage_user_info{{{SEL}}}))"
)


def exporter_health() -> db.Dashboard:
    def rate(metric: str, by: str, extra: str = "") -> str:
        return f"sum by ({by}) (rate({metric}{{{SEL}{extra}}}[$__rate_interval]))"

    durations = "connect_usage_poll_duration_seconds_bucket"
    return (
        new_dashboard(
            "connect-usage-exporter-health",
            "Connect usage / Exporter health",
            "Is the exporter scraping, polling Connect and keeping up?",
        )
        .with_panel(
            st(
                "Exporter up (Connect polls succeed)",
                [query(f"connect_usage_up{{{SEL}}}", "{{instance}}")],
            )
        )
        .with_panel(
            st("Scrape up", [query(f"up{{{SEL}}}", "{{instance}}")]),
        )
        .with_panel(
            st(
                "Counting since",
                [query(f"min(connect_usage_counting_since_timestamp_seconds{{{SEL}}}) * 1000")],
                "dateTimeFromNow",
            )
        )
        .with_panel(
            tbl(
                "Exporter version",
                f"max by (instance, version) (connect_usage_exporter_build_info{{{SEL}}})",
                w=3,
                h=4,
            )
        )
        .with_panel(
            tbl(
                "Connect version",
                f"max by (version) (connect_usage_server_info{{{SEL}}})",
                w=3,
                h=4,
            )
        )
        .with_panel(
            ts(
                "Poll lag (Connect's now - high-water mark)",
                [query(f"connect_usage_poll_lag_seconds{{{SEL}}}", "{{instance}} {{stream}}")],
                "s",
            )
        )
        .with_panel(
            ts(
                "Connect's clock - the exporter's",
                [query(f"connect_usage_connect_clock_offset_seconds{{{SEL}}}", "{{instance}}")],
                "s",
            )
        )
        .with_panel(
            ts(
                "Time since last successful poll",
                [
                    query(
                        f"time() - connect_usage_last_successful_poll_timestamp_seconds{{{SEL}}}",
                        "{{instance}} {{stream}}",
                    )
                ],
                "s",
            )
        )
        .with_panel(
            ts(
                "Connect API requests by status",
                [
                    query(
                        rate("connect_usage_api_requests_total", "instance, status"),
                        "{{instance}} {{status}}",
                    )
                ],
                "reqps",
            )
        )
        .with_panel(
            ts(
                "Connect API requests by endpoint",
                [
                    query(
                        rate("connect_usage_api_requests_total", "endpoint"),
                        "{{endpoint}}",
                    )
                ],
                "reqps",
            )
        )
        .with_panel(
            ts(
                "Poll duration quantiles",
                queries(
                    *(
                        (
                            f"histogram_quantile({q}, {rate(durations, 'instance, stream, le')})",
                            f"p{round(q * 100)} {{{{instance}}}} {{{{stream}}}}",
                        )
                        for q in QUANTILES
                    )
                ),
                "s",
            )
        )
        .with_panel(
            ts(
                "Poll errors",
                [
                    query(
                        rate("connect_usage_poll_errors_total", "instance, stream"),
                        "{{instance}} {{stream}}",
                    )
                ],
                "ops",
            )
        )
        .with_panel(
            ts(
                "Events ingested",
                [
                    query(
                        rate("connect_usage_events_ingested_total", "instance, stream"),
                        "{{instance}} {{stream}}",
                    )
                ],
                "ops",
            )
        )
        .with_panel(
            ts(
                "Excluded events (synthetic, malformed)",
                queries(
                    (
                        rate("connect_usage_excluded_events_total", "instance, stream, reason"),
                        "{{instance}} {{stream}} {{reason}}",
                    ),
                    (
                        rate(
                            "connect_usage_excluded_events_total",
                            "instance, stream",
                            ', reason="malformed"',
                        ),
                        "malformed {{instance}} {{stream}}",
                    ),
                ),
                "ops",
            )
        )
    )


DASHBOARDS = {
    "usage-overview.json": usage_overview,
    "content-detail.json": content_detail,
    "exporter-health.json": exporter_health,
}


def to_dict(builder: db.Dashboard) -> dict[str, Any]:
    """Build a dashboard, number its panels and return it as plain JSON data."""
    data: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    for number, panel in enumerate(data["panels"], start=1):
        panel["id"] = number
    return data


def render(builder: db.Dashboard) -> str:
    return json.dumps(to_dict(builder), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {name: render(make()) for name, make in DASHBOARDS.items()}


def panel_queries(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of a dashboard's JSON."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in data["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


GRAFANA_DEFAULTS = {"__rate_interval": "4m", "__interval": "1m", "__range": "1h"}
# Custom variables' defaults, as a dashboard opens (a caller's values override them).
UNUSED_DAYS_DEFAULT = "30"
VARIABLE_DEFAULTS = {"unused_days": UNUSED_DAYS_DEFAULT}


def unsubstituted(expr: str) -> list[str]:
    """Grafana variables left in `expr` (a label_replace group such as `$1` is not one: Grafana
    replaces only the variables it knows)."""
    return re.findall(r"\$\{?[A-Za-z_]\w*", expr)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($name and ${name}) the way Grafana would before querying."""
    merged = {**GRAFANA_DEFAULTS, **VARIABLE_DEFAULTS, **values}
    # longest names first, so $__range does not eat $__range_s and $job does not eat $jobs
    for name in sorted(merged, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", merged[name]).replace("$" + name, merged[name])
    return expr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for directory in OUTPUT_DIRS:
        for name, text in rendered().items():
            path = directory / name
            if args.check:
                if not path.is_file() or path.read_text(encoding="utf-8") != text:
                    stale.append(path)
            else:
                directory.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"out of date: {path.relative_to(ROOT)}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
