// bench/report_load.py's minimal Plotly page: the same runs drawn with Plotly, for comparison
const D = JSON.parse(document.getElementById('d').textContent);
const runs = D.runs, cols = runs.columns, n = runs.data[0].length, at = (c) => runs.data[cols.indexOf(c)];
let h = '<tr>' + cols.map((c) => '<th>' + c + '</th>').join('') + '</tr>';
for (let i = 0; i < Math.min(n, 500); i++) h += '<tr>' + cols.map((c, j) => '<td>' + runs.data[j][i] + '</td>').join('') + '</tr>';
document.getElementById('t').innerHTML = h;
(async () => {
  await Plotly.newPlot('a', [{type: 'scattergl', mode: 'markers', x: at('lr'), y: at('test_acc')}], {xaxis: {type: 'log'}});
  const curves = D.curves.series.test_acc.slice(0, 5).map((s) => ({type: 'scatter', x: D.curves.steps[s[1]], y: s[3]}));
  await Plotly.newPlot('b', curves);
  const cell = {}; at('width').forEach((w, i) => { const k = w + ',' + at('lr')[i]; (cell[k] = cell[k] || []).push(at('test_acc')[i]); });
  const keys = Object.keys(cell);
  await Plotly.newPlot('c', [{type: 'heatmap', x: keys.map((k) => k.split(',')[0]), y: keys.map((k) => k.split(',')[1]),
                              z: keys.map((k) => cell[k].reduce((a, b) => a + b, 0) / cell[k].length)}]);
  window.dlstoreReady = performance.now();
})();