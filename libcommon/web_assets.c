/* Owns serving the embedded web client: path lookup, content types and the
 * HTTP headers (caching, content security policy). */
#include "web_assets.h"
#include "common.h"

#include <microhttpd.h>
#include <string.h>

/* The client has no build step and its file names carry no version, so a
 * browser must revalidate every load (cheap: a 304 on a matching ETag)
 * rather than run a stale app.js against a newer gateway. */
#define WEB_ASSETS_CACHE "no-cache"

/* Scripts, styles and images only from the gateway itself; media is shown
 * through blob: URLs (fetched with the token); the WebSocket is same-origin. */
#define WEB_ASSETS_CSP                                                                   \
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "           \
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

static const struct {
    const char *ext;
    const char *type;
} web_assets_types[] = {
    { ".html", "text/html; charset=utf-8" },
    { ".js", "text/javascript; charset=utf-8" },
    { ".css", "text/css; charset=utf-8" },
    { ".svg", "image/svg+xml" },
    { ".png", "image/png" },
    { ".ico", "image/x-icon" },
    { ".json", "application/json" },
};

const web_asset *web_assets_find(const char *url)
{
    if (strcmp(url, "/") == 0)
        url = "/index.html";
    for (size_t i = 0; i < web_assets_count; i++)
        if (strcmp(web_assets_table[i].path, url) == 0)
            return &web_assets_table[i];
    return NULL;
}

const char *web_assets_type(const char *path)
{
    const char *dot = strrchr(path, '.');
    for (size_t i = 0; dot != NULL && i < PX_ARRAY_LEN(web_assets_types); i++)
        if (strcmp(dot, web_assets_types[i].ext) == 0)
            return web_assets_types[i].type;
    return "application/octet-stream";
}

int web_assets_respond(struct MHD_Connection *mc, const web_asset *a)
{
    const char *inm = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_IF_NONE_MATCH);
    int fresh = inm != NULL && strstr(inm, a->etag) != NULL;
    struct MHD_Response *r = MHD_create_response_from_buffer(fresh ? 0 : a->len, (void *)a->data,
                                                             MHD_RESPMEM_PERSISTENT);
    const char *type = web_assets_type(a->path);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, WEB_ASSETS_CACHE);
    MHD_add_response_header(r, MHD_HTTP_HEADER_ETAG, a->etag);
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    if (strncmp(type, "text/html", 9) == 0)
        MHD_add_response_header(r, "Content-Security-Policy", WEB_ASSETS_CSP);
    enum MHD_Result ret = MHD_queue_response(mc, fresh ? MHD_HTTP_NOT_MODIFIED : MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}
