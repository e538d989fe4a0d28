// Draws every chart of a dashboard page from the JSON the server rendered into #charts.
(function () {
  var charts = JSON.parse(document.getElementById("charts").textContent);
  document.querySelectorAll("[data-chart]").forEach(function (div) {
    var chart = charts[div.getAttribute("data-chart")];
    if (chart) {
      Plotly.newPlot(div, chart.data, chart.layout, {displaylogo: false, responsive: true});
    }
  });
})();
